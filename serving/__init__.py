"""The HTTP API: ingestion, recommendations, health and metrics."""

# Importing Feast sets PROMETHEUS_MULTIPROCESS_DIR, which flips prometheus_client into
# multiprocess mode if it is imported afterwards; importing it first keeps streamrec's own
# metrics ordinary in-process ones.
import prometheus_client  # noqa: F401
