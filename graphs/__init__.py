"""How a step function is executed (eager today; compile and CUDA-graph backends follow, DESIGN.md §6)."""
