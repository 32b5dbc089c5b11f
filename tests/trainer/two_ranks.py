"""One rank of a two-process world that torchrun started on 127.0.0.1: runs the
`mmeff.trainer.fit` jobs given as JSON [{"config": PATH, "overrides": [...], "resume": ...}] one after another."""

import json
import sys

import torch

from mmeff import config, trainer
from mmeff.cli import leave_process_group

if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks on two cores
    for job in json.loads(sys.argv[1]):
        trainer.fit(config.load(job["config"], job.get("overrides", [])), resume=job.get("resume"), overwrite=True)
    leave_process_group()  # as the mmeff command does when it returns
