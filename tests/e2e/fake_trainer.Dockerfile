# TEST DOUBLE trainer image: tests/e2e/fake_trainer.py on Python with PyYAML, for operator e2e tests
# on the real node (tests/e2e/test_real_node.py builds it FROM the operator image, with this
# directory as the context). Never shipped: the operator runs it through KUBETUNE_TRAINER_COMMAND.
ARG BASE_IMAGE=kubetune/operator
FROM ${BASE_IMAGE}
COPY fake_trainer.py /opt/kubetune-test/fake_trainer.py
ENTRYPOINT ["python", "/opt/kubetune-test/fake_trainer.py"]
