"""Speed, memory and convergence benchmarks; results go to BENCHMARKS.md with their commands."""
