"""Tests of loss/: ProxyGML, its distributed forms, the baselines and the proxy statistics."""
