"""The live demo: a real broker, a coordinator and edge daemons as processes on one machine."""
