"""The pure domain: periods, lifecycle, what each event type does, the partition engine and its batch step,
aggregation, KPIs and the ledger.  No faust, Kafka, Redis or Prometheus."""
