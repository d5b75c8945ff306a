"""Run the PIIP benchmarks: `python benchmarks/run_benchmarks.py all --variants published --repeats 3`.

The same as `piip-llava bench ...`; the script runs unchanged on a GPU (bf16, SDPA) and on CPU (fp32).
Reports go to benchmarks/results/ as markdown and JSON.
"""

import sys

from piip_llava.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
