"""The controller: registry (SQLite), locality-aware placement, the route API for the gateway, and autoscaling
over Slurm allocations running node agents. See docs/controller.md and docs/placement.md."""
