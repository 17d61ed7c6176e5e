"""The balloon device: what the daemon does with what the guest puts on its queues."""
