"""The services behind the routes: what can be served (catalog), the engines, generation."""
