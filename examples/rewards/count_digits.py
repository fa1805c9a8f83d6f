"""A programmatic reward for `command:` sources: reads JSONL rows {"prompt", "response"} on stdin
and prints, one per line, the number of digits in each response."""
import json
import sys

for line in sys.stdin:
    if line.strip():
        print(sum(c.isdigit() for c in json.loads(line)["response"]), flush=True)
