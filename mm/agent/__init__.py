"""A ReAct agent over any chat model: a tool registry, the Thought/Action/Observation loop, SOP mode."""
