/*
 * StatsD configuration for the agentq compose stack (mounted over /usr/src/app/config.js in the
 * statsd/statsd image). agentq services send metrics to statsd:8125 over UDP.
 *
 * By default the flushed aggregates are written to the container log
 * (`docker compose logs -f statsd`). To forward them to Graphite instead, set on the statsd
 * service:
 *   STATSD_BACKENDS=./backends/graphite   (comma-separated; both: ./backends/console,./backends/graphite)
 *   GRAPHITE_HOST=graphite                GRAPHITE_PORT=2003
 *   STATSD_FLUSH_INTERVAL_MS=10000
 */
{
  port: 8125,
  address: "0.0.0.0",
  mgmt_port: 8126,
  mgmt_address: "0.0.0.0",
  flushInterval: parseInt(process.env.STATSD_FLUSH_INTERVAL_MS || "10000", 10),
  backends: (process.env.STATSD_BACKENDS || "./backends/console").split(","),
  graphiteHost: process.env.GRAPHITE_HOST || "graphite",
  graphitePort: parseInt(process.env.GRAPHITE_PORT || "2003", 10),
  console: { prettyprint: false },
  deleteIdleStats: true,
  automaticConfigReload: false
}
