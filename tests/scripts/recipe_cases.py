"""Run the recipe's ``main`` on several command lines in one process, as a job would run each one.

    python recipe_cases.py CASES.json

CASES.json holds a list of argument lists. Before each case a line ``=== case N`` goes to stderr and
after it ``=== exit N CODE``; the process exits with the last case's code. One interpreter for all
cases keeps the test fast (importing torch dominates a process's start) while stderr and the exit
code are still those of a real process, with its own logging and warning handlers.
"""

import json
import sys

from hf_spectralkd.cli.distill import main

cases = json.loads(open(sys.argv[1], encoding="utf-8").read())
code = 0
for index, argv in enumerate(cases):
    print(f"=== case {index}", file=sys.stderr, flush=True)
    code = main(argv)
    print(f"=== exit {index} {code}", file=sys.stderr, flush=True)
sys.exit(code)
