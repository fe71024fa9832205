"""Framework integrations: a key per agent at the injection point each framework has.

Import the module of your framework (each needs that framework installed):
`bulkhead.integrations.langchain`, `.crewai`, `.autogen`, `.openai_agents`. Each has
`guard(tool, client, *, scope, cost)`, which makes a tool spend `cost` under `scope` with that
client's key before it runs, and a model factory pointed at the gateway with the agent's key.
"""
