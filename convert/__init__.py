"""Programs that convert BridgeTower checkpoints and check parity with PyTorch."""
