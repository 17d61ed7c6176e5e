"""What operators touch: the daemon's entry point, configuration, the control
API, the balloonctl CLI and Prometheus metrics."""
