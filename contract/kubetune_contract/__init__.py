"""KubeTune's contracts: what the operator and the trainer agree on, and nothing else.

- ``config``: a training run (the FineTuneJob's training sections, the trainer's config file) and
  the trainer's exit codes;
- ``rules``: the run's cross-field rules (CEL for the CRD, the messages the models raise);
- ``events``: progress reports and the final summary the trainer sends;
- ``estimate``: the pure GPU-memory estimate (the operator's WontFit, the trainer's auto-fit);
- ``s3``: how an s3:// URI and a storage endpoint are read;
- the version of the whole distribution.

It imports pydantic and the standard library only; both images install it, and neither the operator
(``kubetune``) nor the trainer (``kubetune_trainer``) imports the other.
"""

__version__ = "0.1.0"
