"""Pure delivery rules: retry schedule, reply classification. No I/O; time is an argument."""
