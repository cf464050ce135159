"""KubeTune operator: FineTuneJob (kubetune.io/v1alpha1) → a GPU training Job, with live status."""

__version__ = "0.1.0"
