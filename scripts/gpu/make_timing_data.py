"""Synthetic rows long enough that every sequence is truncated to max_length on both sides, so each
step processes exactly batch x max_length tokens per sequence. Usage: make_timing_data.py OUT ROWS"""
import json, random, sys

out, rows = sys.argv[1], int(sys.argv[2])
words = ("the a film story actor scene music ending plot good bad great slow funny long short camera "
         "light night city house friend family voice dream love war time year people").split()
rng = random.Random(0)
say = lambda n: " " + " ".join(rng.choice(words) for _ in range(n))
with open(out, "w") as f:
    for _ in range(rows):
        f.write(json.dumps({"prompt": say(12).strip(), "completion": say(3000), "chosen": say(3000),
                            "rejected": say(3000)}) + "\n")
