"""What every stage shares and no stage owns: the error policy of the console scripts for now
(`fdf_core.errors`, `fdf_core.console`); issue 10 moves the other common helpers here."""
