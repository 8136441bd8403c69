"""Test configuration: never touch a model hub; keep CPU threads modest on the 2-core machines."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and a second thread spinning against other
# processes on a 2-core machine makes them up to 10x slower; subprocesses inherit OMP_NUM_THREADS.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
