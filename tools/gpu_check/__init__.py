"""GPU validation in one go: tools/gpu_check.sh (docs/gpu_check.md).

On a machine with an NVIDIA GPU, in under 8 minutes of wall time (a total budget, and a time
limit per step; a failing or slow step is recorded and the later steps still run):
  1. build    pip install the checkout with CUDA for the detected architecture only (build.py)
  2. tests    every `cuda`-marked test and the Triton tests on the device (tests_step.py)
  3. sanitize compute-sanitizer memcheck on each CUDA kernel family, racecheck on the merge's
              exact-k selection (sanitize.py, sanitize_driver.py)
  4. bench    the GPU benchmarks at the issue's sizes, next to torch and copy bandwidth (bench_step.py)
  5. report   gpu_check.json + gpu_check.md + logs/ under --out, the issue's targets as
              met / not met / not measured (targets.py, report.py), a one-screen summary last
--dry-run does steps 1-2 on the CPU (no CUDA build, Triton in the interpreter) and the
report, which tests/test_gpu_check.py runs in CI.
"""
