"""nnU-Net experiment planners for PUMIT networks."""
