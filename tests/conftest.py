import os

# Tests never reach a model hub: a hub name fails fast instead of retrying for ~20 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
