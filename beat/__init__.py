"""agentq beat: the periodic schedule and its jobs."""
