"""KubeTune operator: FineTuneJob (kubetune.io/v1alpha1) → a GPU training Job, with live status."""

from kubetune_contract import __version__ as __version__  # one version for the whole distribution
