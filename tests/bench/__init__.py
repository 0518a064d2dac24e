"""Tests for the bench package: the accuracy audit and the load client."""
