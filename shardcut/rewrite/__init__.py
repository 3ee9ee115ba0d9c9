"""The writer: layout of the output, side files, the crash-safe output folder, `--stream`."""
