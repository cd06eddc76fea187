// Callback style: finish with response.complete(body) or response.error(err).
module.exports.handler = function (request, response, modules) {
  setTimeout(() => response.complete({ doubled: (request.n ?? 21) * 2 }), 5);
};
