"""A `command:` reward for the GPU check's GRPO step: the response's length in characters, which
varies between a random model's samples (the digit count of examples/rewards is 0 for nearly all of
them, leaving every advantage, and so every gradient, zero)."""
import json
import sys

for line in sys.stdin:
    if line.strip():
        print(len(json.loads(line)["response"]), flush=True)
