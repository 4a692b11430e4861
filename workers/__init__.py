"""agentq workers: the process that executes agent runs, and the engine inside it."""
