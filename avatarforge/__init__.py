"""avatarforge: reference video + audio -> lip-synced talking-head video, trained on Ray + DeepSpeed."""

__version__ = "0.1.0"
