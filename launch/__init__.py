"""ndtrain.launch: the `ndtrain` command line, configs, launchers for each backend, reports and plots."""
