"""Speed and accuracy benchmarks; run from the repository root, outside CI (CI runs smoke versions)."""
