# nothing here
# still nothing
