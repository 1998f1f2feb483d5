"""Prometheus export: counters, scrape-time state gauges and live KPI gauges."""
