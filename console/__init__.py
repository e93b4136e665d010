"""What a terminal sees, for every layer and entry point: console output (`output`: progress bars,
results, `--verbose`) and how a command line parses and runs (`command`: one-line errors, exit
statuses). Below the builder, calibration, the benchmarks and the command; above the runtime,
which never imports it (its errors name no flag)."""
