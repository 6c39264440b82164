"""Watch a federation: a live web page and Prometheus `/metrics`, fed by coordinator or simulator events."""
