"""Test support shared by the SDK's and the framework integrations' tests."""
