"""The `knnflow` command line: argument handling only; the work happens in the knnflow package."""
