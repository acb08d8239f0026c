"""Schedule search (G-Search, P-Sigmoid, VTW's layer): calibration data -> a per-layer keep schedule."""
