"""Where the code runs: devices and dtypes, model sources and model folders, progress and interrupts."""
