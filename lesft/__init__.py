"""lesft: split federated fine-tuning of decoder LLMs with the LESFT token-weighted loss."""

__version__ = "0.1.0"
