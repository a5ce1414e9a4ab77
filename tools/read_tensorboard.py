#!/usr/bin/env python3
"""Reads the scalars of a TensorBoard log folder with the `tensorboard` package and prints them as
JSON lines {"tag", "step", "value"} (used by tests/train.rs to check llama-cpt's event files).

    python tools/read_tensorboard.py LOG_DIR
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
    acc.Reload()
    for tag in sorted(acc.Tags()["scalars"]):
        for ev in acc.Scalars(tag):
            print(json.dumps({"tag": tag, "step": ev.step, "value": ev.value}))


if __name__ == "__main__":
    main()
