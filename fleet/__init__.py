"""Fleet mode: headless sensors shipping history to ClickHouse (sensor.py, spool.py, cli.py)."""
