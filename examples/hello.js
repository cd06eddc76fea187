// A request hook: async style. `request` is the job's input; `modules` the granted capabilities.
exports.handler = async (request, modules) => {
  await modules.log.info("greeting", { name: request.name ?? "world" });
  console.log("stdout is captured too");
  return { greeting: `hello, ${request.name ?? "world"}`, node: process.version };
};
