// Builds the etcd server from the upstream go.etcd.io/etcd/server/v3 module.
module kubetune.io/hack/etcd

go 1.26.0

require go.etcd.io/etcd/server/v3 v3.6.16
