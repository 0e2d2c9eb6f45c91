"""How jobs are launched (imported as tensafe.launchers)."""
