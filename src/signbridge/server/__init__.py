"""The signing service: HTTP API, keystores, authorization, audit log and timestamp authority."""
