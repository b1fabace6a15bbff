"""Job specs, stages, Ray orchestration and the `moeforge` command line."""
