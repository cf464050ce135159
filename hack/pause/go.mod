// The pause program of the real node's sandbox image (devcluster/real_node.py builds it).
module kubetune.io/hack/pause

go 1.25.0
