"""The GPU device run's modules (the entry point and its command line: experiments/gpu_device_run.py).

common (what the run covers, GPU implementation discovery), budget (time budget, output files, log),
watchdog (the hard stop), env (the environment report), cases (conformance cases), conformance (the
runner and the recorded device results), runner (timed calls, errors), fla (flash-linear-attention
through PyTorch), bench (the benchmark), report (the markdown tables).
"""
